// LocalDelivery
